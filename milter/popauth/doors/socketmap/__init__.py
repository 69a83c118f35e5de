"""The socketmap door: Postfix and Sendmail ask the whitelist as a lookup table."""
