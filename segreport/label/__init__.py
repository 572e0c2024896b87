"""The MONAI Label app: segreport's bundles served to 3D Slicer and OHIF (``segreport label``).

- :mod:`.app`: ``SegreportLabelApp``, the ``MONAILabelApp`` the server loads (the app folder's
  ``main.py`` imports it);
- :mod:`.tasks`: infer tasks over the shared predictors (the interactive 3D report with a prompt
  session per image; MedSegText; the text-guided TMC and LAPFT);
- :mod:`.training`: the train task, a bundle's own train config on the studies' labels;
- :mod:`.server`: the ``segreport label`` command; :mod:`.asgi`: MONAI Label's ASGI app with 4xx handlers.

Nothing here is imported by the rest of segreport: only the server needs ``monailabel``.
"""
