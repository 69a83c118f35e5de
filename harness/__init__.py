"""The harness tests and benchmarks share: private daemons, popauth processes and clients.

Real daemons (Postfix, Dovecot, Sendmail, Redis and Sentinel, rsyslog, POP3
servers unpacked from their .debs), each on loopback in a directory of its
own; the popauth processes (``serve``, ``follow``, ``sessions``) with their
JSON logs; the SMTP client; and what a run checks at its end (no daemon left
behind). Nothing here imports the tests.
"""
