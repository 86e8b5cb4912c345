"""The foundation every package stands on (logging, metrics, client errors, config files and
paths, the local Ray instance, CPU priority); it imports nothing else of the project."""
