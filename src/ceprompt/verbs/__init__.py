"""The command-line verbs that use a model: predict, eval, export (ONNX, Hub), doctor, and the pictures they
draw. ``serve`` and ``demo`` have folders of their own beside this one."""
