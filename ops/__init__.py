"""Operations: the one Settings, logging, metrics, the `protege` CLI, model fetching."""
