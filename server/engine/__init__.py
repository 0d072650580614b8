"""The only package that imports vLLM.

vLLM loads `plugin.register` in every one of its processes, so this file and `plugin.py` stay free of
heavy imports; the model classes, the custom op and the routing are imported lazily by vLLM itself.
"""
