"""Models: where one comes from and what may run with it, below the data, the planner and the
trainer (nothing here imports them).

- ``source``: ``model.name`` (hub id, local directory, built-in) → a loadable path; config.json
  without weights; ``ModelError``.
- ``consent``: whether code shipped with a model may run now (``remote_code_allowed``).
- ``runtime``: device, dtype, 4-bit or not, the attention kernel, ``packing_isolated``.
- ``tokenizer``: the tokenizer with its chat template (``load_tokenizer``; ChatML when it has none).
- ``processor``: an image-text model's processor (image processor + tokenizer + template).
- ``builtin``: the offline built-ins (``builtin:tiny``, ``builtin:tiny-vl``, the sample data,
  ``CHATML_TEMPLATE``).
- ``rope``: ``model.rope_scaling`` against a model's config.json.

Loading weights onto a device (bitsandbytes, PEFT) is the trainer's: ``engine.training.model``.
"""
