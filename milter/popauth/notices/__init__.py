"""Notices: each user still relaying by POP-before-SMTP is told so, in their own mailbox."""
