"""Configuration: the training config (`training`: dataclasses from YAML + ``--section.key`` overrides,
validated in one place) and the limits every layer shares (`limits`, no torch)."""
