"""popauth: POP-before-SMTP relay control as a milter."""
