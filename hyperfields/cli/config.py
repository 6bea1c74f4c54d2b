"""`hyperfields config`: the resolved configuration, printed as YAML that --config reads back."""

from __future__ import annotations

import typer
import yaml

from hyperfields.cli.common import ConfigOption, SetOption, note, reports_errors
from hyperfields.config import load_config


@reports_errors
def config_command(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Print the configuration a command would run with: defaults, then --config, then every --set, as YAML."""
    resolved = load_config(config, list(set_ or []), note)
    typer.echo(yaml.safe_dump(resolved.to_dict(), sort_keys=False), nl=False)
