"""The built-in technique plugins; they register through the same hooks as third-party ones."""
