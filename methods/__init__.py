"""Built-in distillation methods, one module each; registered in cdmbench.registry."""
