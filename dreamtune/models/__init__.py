"""Loading a base model, the one pipeline builder, scheduler resolver and dtype table, and model factories."""
