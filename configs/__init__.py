"""The configuration presets shipped with hyperfields; `--config sd15` names sd15.yaml here."""
