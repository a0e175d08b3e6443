"""Models nbkit works with: tiny offline ones for tests and demos, and the registry of real ones."""
