"""The bottom layer of ganforge: the config base and the image spec, importing nothing of ganforge."""
