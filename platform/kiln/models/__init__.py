"""Model builders, the model spec (architecture + preprocessing + labels) and safe loading."""
