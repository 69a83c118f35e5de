"""Values every layer shares: client addresses, user names, text shown safely, time."""
