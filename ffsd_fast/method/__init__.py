"""The method layer: FFSD's networks (students, fusion module, leader, self-distillation decoders), its loss terms,
and the loader of the authors' weights."""
