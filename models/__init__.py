"""Model definitions and checkpoint loaders (installed as `flashdreams.models`)."""
