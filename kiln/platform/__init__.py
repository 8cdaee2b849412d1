"""The job layer: CLI, recipes, Ray connect/start, run directories, quickstart, reports.

Import the submodules you need (`kiln.platform.api`, `kiln.platform.recipes`, ...): this
package re-exports nothing, so `import kiln.platform.recipes` stays free of Ray and torch.
"""

__all__: list[str] = []
