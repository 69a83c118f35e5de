"""Postfix's SMTP access policy delegation: ``check_policy_service``."""
