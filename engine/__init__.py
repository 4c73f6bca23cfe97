"""fedlog's engine: event-sourced state machines for federated learning."""
