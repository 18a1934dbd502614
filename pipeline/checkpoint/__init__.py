"""Checkpoints: Composer's saver with signing and retention (saver.py), a save folder local or in
a bucket and its signed manifests (folder.py), where a run resumes (resume.py: returns what it
found, no module state) and safe loading (loading.py). Imports config, common and compat."""
