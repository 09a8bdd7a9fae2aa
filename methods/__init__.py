"""The built-in methods, one module each. Importing a module registers its method."""
