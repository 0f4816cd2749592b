from llmser_ray.cli import app

app(prog_name="llmser-ray")
