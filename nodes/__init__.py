"""ComfyUI nodes (V3 schema). Imported only by ComfyUI, through ``comfy_entrypoint``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class MoEExtension(ComfyExtension):
    """The pack's one extension: every node it registers."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from . import paths, routes
        from .ab_nodes import NODES as AB_NODES
        from .online_learning import nodes as online_nodes
        from .sampler_nodes import NODES as SAMPLER_NODES
        from .stats_nodes import NODES as STATS_NODES
        from .training_nodes import NODES as TRAINING_NODES

        paths.register_folders()
        routes.register()
        return [*SAMPLER_NODES, *AB_NODES, *TRAINING_NODES, *STATS_NODES, *online_nodes()]
