"""Sub-commands of the ``metaformer`` command line (see ``metaformer.cli``)."""
