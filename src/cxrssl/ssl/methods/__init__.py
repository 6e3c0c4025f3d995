"""Pretraining methods, one module each; :func:`cxrssl.ssl.registry.methods` imports them all.

A new method is a module here (a :class:`cxrssl.ssl.registry.PretrainMethod` subclass decorated
with ``@register``) and its settings block ``pretrain.<name>`` in the config schema; nothing else.
"""
