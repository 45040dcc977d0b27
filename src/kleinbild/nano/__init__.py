"""nano's world: the procedural shapes world, its pixel analyser, evaluation, and the nano training recipe."""
