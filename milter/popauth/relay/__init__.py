"""The relay decision: pure functions, the recipients they judge, the gate to the store."""
