"""Fast ops, each beside a plain reference with the same name and signature."""
