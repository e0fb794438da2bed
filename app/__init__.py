"""The cua-kit Gradio dashboard (runs, curves, groups, replay, launch); start it with `cua-kit dashboard`."""
