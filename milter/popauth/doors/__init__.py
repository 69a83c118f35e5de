"""The ways in: the milter, the ingest, socketmap and policy sockets, their shared server."""
