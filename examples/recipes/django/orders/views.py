import json

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from orders.models import Order


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@csrf_exempt
def create_order(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    order = Order.objects.create(sku=body["sku"], quantity=body["quantity"])
    return JsonResponse({"id": order.id}, status=201)


def get_order(request: HttpRequest, order_id: int) -> JsonResponse:
    order = Order.objects.filter(id=order_id).first()
    if order is None:
        return JsonResponse({"error": "no such order"}, status=404)
    return JsonResponse({"id": order.id, "sku": order.sku, "quantity": order.quantity})
