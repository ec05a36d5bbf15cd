"""One ConfigurableResource per external system; ops_platform.environment picks the set."""
