"""``python -m gan_dist``: the gan-dist command (how submitted jobs start on a cluster)."""

from gan_dist.cli import app

app(prog_name="gan-dist")
