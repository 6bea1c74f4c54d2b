"""`hyperfields evaluate`: images of each subject from the base model, the field, refinement and real optimisation,
scored for identity (DINO, CLIP-I, face) and prompt fidelity (CLIP-T)."""
