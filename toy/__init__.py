"""The toy world: everything that makes Carve3D runnable and measurable offline, apart from the method.

  world.py     the procedural world: prompt grammar with a compositional test split, objects of 3D Gaussians,
               ground-truth renders, controlled distortions (Carve3D Sec. 3's robustness experiment)
  prompts.py   the prompt sources (toy:train, toy:test, or a file for the paper setup)
  fidelity.py  the prompt-fidelity and size metrics of 4-view samples, against ground-truth renders
  sft.py       supervised finetuning of the toy VAE, MVDream and LGM (the "SFT" models RL starts from)

The method files (mvdream.py ... train.py) use the same classes for the toy world and the paper setup; only
the checkpoints and the config (toy.yaml vs config.yaml) differ.
"""
