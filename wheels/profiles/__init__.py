"""nbkit's wheel profiles, shipped as package data (the folders beside this file)."""
