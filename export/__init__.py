"""Tracing models into static-shape step graphs and compiling them (installed as `flashdreams.export`)."""
