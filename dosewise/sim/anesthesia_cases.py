"""Import path kept for existing scripts: the surgical cases live in `dosewise.sim.anesthesia.cases`."""

from dosewise.sim.anesthesia.cases import *  # noqa: F403
