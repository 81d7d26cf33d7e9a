"""The remote tier: compressed objects in segments on a Redis Cluster.

:mod:`.client` is the data path (trio streams, hiredis's parser, slot routing, redirections,
deadlines, typed failures).
"""
