"""flowertune-llm: the ClientApp. Plain Flower + PEFT: load the global adapter, train, reply with the new one."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_llm.task import get_model, load_data, settings
from flowertune_llm.task import train as train_locally

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = settings(context.run_config)
    partition_id, num_partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    model = get_model(cfg)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    data = load_data(partition_id, num_partitions, cfg)
    server_round = int(msg.content["config"]["server-round"])
    loss = train_locally(model, data, cfg, seed=1000 * server_round + partition_id)
    content = RecordDict({"arrays": ArrayRecord(get_peft_model_state_dict(model)),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(data)})})
    return Message(content=content, reply_to=msg)
