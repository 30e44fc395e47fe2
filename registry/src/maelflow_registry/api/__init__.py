"""The REST API, one ``APIRouter`` per resource, in the FastAPI template's shape.

``entries`` is the anemoi-registry protocol (``/api/v1/<collection>[/<key>]``, for every registered
collection); ``models``, ``lineage`` and ``artefacts`` are the catalogue's extras; ``service`` and
``admin`` are health, client settings and maintenance. Auth and the catalogue arrive as typed
parameters from :mod:`.deps`. :func:`maelflow_registry.app.create_app` includes the routers, the
specific paths before the generic ``/{collection}/{key}`` ones.
"""

API = "/api/v1"
