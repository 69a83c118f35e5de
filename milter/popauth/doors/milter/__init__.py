"""The milter door: the pymilter adapter, the MTA's macros, libmilter's listener."""
