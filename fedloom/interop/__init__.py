"""Interoperation with other frameworks (Flower)."""
