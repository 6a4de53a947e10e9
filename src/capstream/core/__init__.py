"""The run core (``run``): what every run does, whatever backend sends its requests; and its
progress bar (``progress``)."""
