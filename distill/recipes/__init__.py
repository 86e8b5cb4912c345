"""Training recipes: one readable class per method (setup, train, cleanup) and a `main()`."""
