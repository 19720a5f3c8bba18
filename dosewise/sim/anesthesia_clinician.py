"""Import path kept for existing scripts: the simulated anesthesiologist lives in
`dosewise.sim.anesthesia.clinician`."""

from dosewise.sim.anesthesia.clinician import *  # noqa: F403
