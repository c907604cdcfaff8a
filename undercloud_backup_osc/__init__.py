"""``openstack undercloud backup``: the project's commands as an OpenStackClient plugin.

The command python-tripleoclient started with (``openstack undercloud backup [--add-path P]
[--exclude-path P]``), kept for the operators who still type it, with ``list``, ``verify``
and ``restore`` beside it. Each is a thin layer over its ``python -m flows.*`` twin: the same
flags, the same flow, the same exit statuses; the Swift login is the ``openstack`` client's
own (``OS_*``, ``--os-cloud``), its output any of the client's formats (``-f json``).
Installed with the project's ``osc`` extra.
"""
