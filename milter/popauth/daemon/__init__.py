"""``popauth serve``: build every piece from the settings, run, reload and stop them."""
