"""What a user may ask for, and how a wrong request ends: the errors that mean "the user asked for something
wrong" and the one line each ends in, the type and range checks of every settings dataclass, comparing
resolved configs, and where the modules named by older configs live now.

The bottom layer: imports nothing from the rest of ddpm.
"""
